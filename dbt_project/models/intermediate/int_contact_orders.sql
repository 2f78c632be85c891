-- Purchase history per contact (paid orders only).

with

orders as (

    select * from {{ ref('stg_ops__orders') }}
    where is_paid

),

category_spend as (

    select
        contact_id,
        category,
        count(*) as category_orders,
        sum(amount) as category_revenue
    from orders
    where category is not null
    group by 1, 2

),

favourite_category as (

    select
        contact_id,
        category as favourite_category,
        row_number() over (
            partition by contact_id
            order by category_orders desc, category_revenue desc, category
        ) as preference_rank
    from category_spend

),

totals as (

    select
        contact_id,
        count(*) as orders_count,
        sum(amount) as revenue,
        min(ordered_at) as first_order_at,
        max(ordered_at) as last_order_at
    from orders
    group by 1

),

final as (

    select
        totals.contact_id,
        totals.orders_count,
        totals.revenue,
        totals.revenue / totals.orders_count as average_order_value,
        totals.first_order_at,
        totals.last_order_at,
        favourite_category.favourite_category
    from totals
    left join favourite_category
        on totals.contact_id = favourite_category.contact_id
        and favourite_category.preference_rank = 1

)

select * from final
