with

contacts as (

    select * from {{ ref('stg_ops__contacts') }}

),

consent_state as (

    select * from {{ ref('int_consent_state') }}

),

contact_orders as (

    select * from {{ ref('int_contact_orders') }}

),

rfm as (

    select * from {{ ref('int_rfm_scores') }}

),

messaging as (

    select * from {{ ref('int_contact_messaging') }}

),

prices as (

    select * from {{ ref('sms_prices') }}

),

default_price as (

    select * from prices where country = 'ZZ'

),

marketing as (

    select * from consent_state where purpose = 'marketing'

),

service as (

    select * from consent_state where purpose = 'service'

),

phone_owners as (

    select
        contact_id,
        row_number() over (partition by phone_e164 order by contact_id) as owner_rank
    from contacts
    where phone_e164 is not null

),

final as (

    select
        contacts.contact_id,
        contacts.external_id,
        contacts.first_name,
        contacts.last_name,
        contacts.gender,
        contacts.birth_date,
        cast(floor({{ dbt.datediff('contacts.birth_date', 'current_date', 'day') }} / 365.25) as integer) as age,
        contacts.email,
        contacts.city,
        contacts.region,

        -- the number
        contacts.phone_e164,
        coalesce(contacts.phone_valid, false) as phone_valid,
        contacts.phone_reason,
        contacts.number_type,
        contacts.country,
        coalesce(phone_owners.owner_rank > 1, false) as is_duplicate_phone,

        -- time zone for quiet hours: the contact's own, else the number's only candidate
        case
            when contacts.time_zone is not null then contacts.time_zone
            when {{ dbt.position("','", 'contacts.phone_time_zones') }} = 0 then contacts.phone_time_zones
        end as time_zone,
        case
            when contacts.time_zone is not null then 'contact'
            when contacts.phone_time_zones is null then 'unknown'
            when {{ dbt.position("','", 'contacts.phone_time_zones') }} = 0 then 'number'
            else 'candidates'
        end as time_zone_source,
        contacts.phone_time_zones as time_zone_candidates,

        -- consent, current
        coalesce(marketing.is_opted_in, false) as marketing_opt_in,
        marketing.last_opt_in_at as marketing_opt_in_at,
        coalesce(marketing.is_opted_out, false) as opted_out,
        marketing.last_opt_out_at as opted_out_at,
        marketing.last_source as marketing_consent_source,
        coalesce(service.is_opted_in, false) as service_opt_in,
        coalesce(service.is_opted_out, false) as service_opted_out,
        coalesce(contacts.phone_valid, false)
            and coalesce(marketing.is_opted_in, false) as is_reachable_marketing,
        coalesce(contacts.phone_valid, false)
            and not coalesce(service.is_opted_out, false) as is_reachable_service,

        -- purchases
        coalesce(contact_orders.orders_count, 0) as orders_count,
        coalesce(contact_orders.revenue, 0) as revenue,
        contact_orders.average_order_value,
        contact_orders.first_order_at,
        contact_orders.last_order_at,
        {{ dbt.datediff('contact_orders.last_order_at', dbt.current_timestamp(), 'day') }} as days_since_last_order,
        contact_orders.favourite_category,
        rfm.r_score,
        rfm.f_score,
        rfm.m_score,
        rfm.rfm_code,
        coalesce(rfm.rfm_segment, 'no_orders') as rfm_segment,

        -- engagement
        coalesce(messaging.messages_sent, 0) as messages_sent,
        coalesce(messaging.messages_delivered, 0) as messages_received,
        coalesce(messaging.messages_clicked, 0) as messages_clicked,
        coalesce(messaging.replies, 0) as replies,
        messaging.last_sent_at,
        messaging.last_delivered_at,
        messaging.last_clicked_at,
        messaging.last_replied_at,

        -- what one SMS segment to this number costs
        coalesce(country_price.price_per_segment, default_price.price_per_segment) as price_per_segment,
        coalesce(country_price.currency, default_price.currency) as price_currency,

        contacts.attributes,
        contacts.created_at

    from contacts
    left join phone_owners
        on contacts.contact_id = phone_owners.contact_id
    left join marketing
        on contacts.phone_e164 = marketing.phone_e164
    left join service
        on contacts.phone_e164 = service.phone_e164
    left join contact_orders
        on contacts.contact_id = contact_orders.contact_id
    left join rfm
        on contacts.contact_id = rfm.contact_id
    left join messaging
        on contacts.contact_id = messaging.contact_id
    left join prices as country_price
        on contacts.country = country_price.country
    cross join default_price

)

select * from final
