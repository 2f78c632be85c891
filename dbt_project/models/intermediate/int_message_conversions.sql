-- Last-touch attribution: each paid order belongs to the latest touch of the same contact
-- (a delivery, or a click on a tracked link) whose own window still covers the order:
-- var('attribution_delivery_window_hours') after a delivery, var('attribution_click_window_hours')
-- after a click. At the same moment a click wins over a delivery. Holdout rows take part
-- with the moment they would have been sent, so the holdout's conversions measure the
-- baseline for uplift.

with

touches as (

    select * from {{ ref('int_message_touches') }}

),

orders as (

    select * from {{ ref('stg_ops__orders') }}
    where is_paid

),

candidates as (

    select
        orders.order_id,
        orders.amount,
        orders.ordered_at,
        touches.message_id,
        touches.touch_type,
        row_number() over (
            partition by orders.order_id
            order by
                touches.touched_at desc,
                case when touches.touch_type = 'click' then 0 else 1 end,
                touches.message_id desc
        ) as touch_rank
    from orders
    inner join touches
        on orders.contact_id = touches.contact_id
        and orders.ordered_at >= touches.touched_at
        and orders.ordered_at < case touches.touch_type
            when 'click' then {{ dbt.dateadd('hour', var('attribution_click_window_hours'), 'touches.touched_at') }}
            else {{ dbt.dateadd('hour', var('attribution_delivery_window_hours'), 'touches.touched_at') }}
        end

),

final as (

    select
        message_id,
        count(*) as conversions,
        sum(amount) as revenue,
        case
            when max(case when touch_type = 'click' then 1 else 0 end) = 1 then 'click'
            else 'delivery'
        end as attributed_touch
    from candidates
    where touch_rank = 1
    group by 1

)

select * from final
